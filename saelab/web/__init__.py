"""The feature browser (`saelab serve`): see `saelab.web.server`."""
