"""Work paid once and read back: decoded videos (prepared media) and the frozen vision tower's features."""
