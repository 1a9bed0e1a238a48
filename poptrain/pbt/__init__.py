"""Population-based training in memory: members' hyperparameters, explore and exploit, and the coordinator's rounds."""
