"""Target-neutral graph passes, one per file, each named verb_object."""
