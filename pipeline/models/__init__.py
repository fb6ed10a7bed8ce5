"""Model families. Each file: config dataclass + nn.Module + loader from the peer's checkpoint format."""
