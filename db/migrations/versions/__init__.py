"""One file per schema change, oldest first by id; each reviewed by hand after autogenerate."""
