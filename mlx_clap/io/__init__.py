"""Files on disk: atomic writes, the converted-folder format, hub downloads."""
