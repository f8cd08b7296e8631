"""The leaf layer: small utilities every other layer may use (atomic writes, paths, errors, image I/O,
registries, device mesh helpers, XLA CPU flags). Imports nothing else of the package."""
