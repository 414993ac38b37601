"""The plan: everything serve will do, computed first, and its rendering."""
