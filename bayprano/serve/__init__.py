"""Ray Serve application that scores images with adapted per-site models over HTTP."""
