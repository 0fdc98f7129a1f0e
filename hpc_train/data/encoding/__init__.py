"""A record and its media as tokens: the chat template, assistant-only labels, where the loss is, lengths without decoding, what a processor says about each media item."""
