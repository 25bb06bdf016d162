"""lowmag.edge: edge-classify, the slide watcher for scanner workstations. Never imports torch."""
