"""Device mesh, logical-axis sharding rules and sequence-parallel (ring) attention."""
