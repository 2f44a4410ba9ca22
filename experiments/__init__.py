"""Top layer: experiment configs, the centralized trainer, the federated driver, and the CLI."""
