from poptrain.cli import main

raise SystemExit(main())
