"""Stage entrypoints (one per stage), their configs and presets, and the pipeline runner."""
