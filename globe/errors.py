"""User-facing errors: the CLI prints `error: <message>` on one line and exits with status 2."""


class GlobeError(Exception):
    """Bad input (paths, configs, checkpoints, artifacts) described in one line."""
