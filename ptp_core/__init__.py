"""ptp_core: soft prompts on frozen backbones (tasks, backbones, PromptModel, trainer, checkpoints).

`from ptp_core import load_checkpoint` works without importing torch until it is called.
"""


def __getattr__(name: str):
    if name in ("load_checkpoint", "Checkpoint"):
        from ptp_core import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'ptp_core' has no attribute {name!r}")
