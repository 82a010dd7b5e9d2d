"""Process-level machinery shared by the scheduler and the workers: the start-up handshake and tier sizing."""
