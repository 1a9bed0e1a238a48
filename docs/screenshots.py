"""Screenshots of the MLflow UI on a real population, for the documentation (a script, not a test).

    python docs/screenshots.py [CONFIG [KEY=VALUE ...]]

runs CONFIG (default: ``configs/pbt.yaml`` cut to 200 steps: eight members, held-out accuracy,
exploits) with poptrain into a temporary folder and its own sqlite store, starts ``mlflow ui`` on
127.0.0.1 over that store, and writes into ``docs/images/``, with headless Chromium (a new profile
each time, so each is what a fresh browser shows):

* ``mlflow-fresh-browser.png``: the experiment as a fresh browser opens it (MLflow 3.17's GenAI view);
* ``mlflow-population-charts.png``: the population's parent run, its metric charts, opened with the
  link ``poptrain run`` prints (the training view);
* ``mlflow-members.png``: the experiment's runs table in the training view, filtered to the members'
  runs (``tags.`poptrain.role` = 'member'``), best held-out accuracy first.

Needs ``chromium`` on the PATH (``apt-get install -y chromium``). ``mlflow ui`` and Chromium's
DevTools endpoint listen on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMAGES = REPO / "docs" / "images"
DEFAULT = ["configs/pbt.yaml", "steps=200"]
# A headless Chromium without its background traffic (updates, sync, QUIC); each shot also gets a
# new profile (`--user-data-dir`), so it shows what a fresh browser shows.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"no answer at {url} within {timeout_s:.0f} s")
        time.sleep(0.5)


async def _shoot(chromium: str, url: str, out: Path, size: str, ready: str, timeout_s: float) -> None:
    # Chromium's DevTools protocol rather than `--screenshot`: the UI draws its charts after its data
    # arrives, which on a busy machine can outlast any fixed (virtual) time budget, so wait in real
    # time until the page shows what the shot is of (`ready`, a JavaScript expression).
    import aiohttp  # comes with ray[default]

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="poptrain-chromium-") as profile:
        browser = subprocess.Popen(
            [
                chromium,
                *CHROMIUM_FLAGS,
                f"--window-size={size}",
                f"--user-data-dir={profile}",
                "--remote-debugging-address=127.0.0.1",
                f"--remote-debugging-port={port}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(f"http://127.0.0.1:{port}/json/version", timeout_s=60)
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{port}/json/list") as answer:
                    page = next(t for t in await answer.json() if t["type"] == "page")
                async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                    calls = iter(range(1, 1 << 30))

                    async def call(method: str, **params):
                        ident = next(calls)
                        await ws.send_json({"id": ident, "method": method, "params": params})
                        while True:
                            message = await ws.receive_json()
                            if message.get("id") == ident:
                                if "error" in message:
                                    raise RuntimeError(f"{method}: {message['error']}")
                                return message["result"]

                    await call("Page.navigate", url=url)
                    deadline = time.monotonic() + timeout_s
                    while True:
                        shown = await call("Runtime.evaluate", expression=f"Boolean({ready})", returnByValue=True)
                        if shown["result"].get("value"):
                            break
                        if time.monotonic() > deadline:
                            print(f"  {out.name}: the page did not show `{ready}` within {timeout_s:.0f} s; shot as it is", file=sys.stderr)
                            break
                        await asyncio.sleep(1)
                    await asyncio.sleep(3)  # the last chart's drawing, the table's last rows
                    shot = await call("Page.captureScreenshot", format="png")
            out.write_bytes(base64.b64decode(shot["data"]))
        finally:
            browser.terminate()
            browser.wait(timeout=30)
    print(f"{out.relative_to(REPO)}  <- {url}")


def screenshot(chromium: str, url: str, out: Path, ready: str, size: str = "1600,1000", timeout_s: float = 180.0) -> None:
    """``url`` as a fresh browser (a new profile) shows it once ``ready`` holds, into ``out``."""
    asyncio.run(_shoot(chromium, url, out, size, ready, timeout_s))


def main(argv: list[str]) -> int:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("docs/screenshots.py: no chromium on the PATH (apt-get install -y chromium)", file=sys.stderr)
        return 2
    config, *overrides = argv or DEFAULT

    from mlflow.tracking import MlflowClient

    import poptrain
    from poptrain.tracking.compare import ui_link

    IMAGES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="poptrain-screenshots-") as folder:
        store = f"sqlite:///{folder}/mlflow.db"
        result = poptrain.run(REPO / config, overrides=[*overrides, f"output_dir={folder}/runs", f"tracking.uri={store}"])
        experiment = MlflowClient(store).get_run(result.run_id).info.experiment_id

        port = free_port()
        server = f"http://127.0.0.1:{port}"
        ui = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store, "--host", "127.0.0.1", "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(f"{server}/health")
            screenshot(
                chromium, f"{server}/#/experiments/{experiment}", IMAGES / "mlflow-fresh-browser.png", ready="document.body.innerText.includes('Traces')"
            )
            # The link poptrain prints, on the run page's metric charts.
            parent = ui_link(server, experiment, result.run_id).replace("?", "/model-metrics?", 1)
            screenshot(
                chromium, parent, IMAGES / "mlflow-population-charts.png", size="1600,1400", ready="document.querySelectorAll('.modebar-container').length >= 7"
            )
            # The table nests members under the population, folded: filtered to members, they are the
            # rows, best held-out accuracy first.
            members = urllib.parse.urlencode(
                {
                    "searchFilter": "tags.`poptrain.role` = 'member'",
                    "orderByKey": "metrics.`eval/accuracy`",
                    "orderByAsc": "false",
                    "workflowType": "machine_learning",
                },
                quote_via=urllib.parse.quote,
            )
            screenshot(
                chromium,
                f"{server}/#/experiments/{experiment}/runs?{members}",
                IMAGES / "mlflow-members.png",
                size="1600,900",
                ready="document.body.innerText.includes('matching runs')",
            )
        finally:
            ui.terminate()
            ui.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
