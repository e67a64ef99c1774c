"""Runnable examples that ship with the package: ``digits`` (a DCNv2 network trained on real digits,
its weights and held-out data), the README's main job."""
