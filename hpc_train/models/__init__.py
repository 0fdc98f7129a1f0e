"""Model families, tiny offline models, and (later) adapters and attention."""
