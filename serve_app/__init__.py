"""Ray Serve chat service."""
