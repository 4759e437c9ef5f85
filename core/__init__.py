"""medtune's domain library: job specs, data preparation, training, inference, persistence.

Nothing here imports from ``api`` or ``worker``; those are thin adapters over this package.
"""
