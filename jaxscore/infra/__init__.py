"""Meshes and sharding, multi-host start-up, checkpoints, files and metric writers."""
