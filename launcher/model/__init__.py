"""Where a model's config and files come from (presets, the Hub, a directory) and the overlay launch writes."""
