"""The model repository format (Triton's layout + manifest.json): names, manifest, config.pbtxt, reading and checking it."""
