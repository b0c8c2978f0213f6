"""One training run from start to finish: `train()`, the run manager the tab and API watch, what a run knows
beyond its config, its folder (identity, listing, clearing), settings that depend on the model family, and
named presets."""
