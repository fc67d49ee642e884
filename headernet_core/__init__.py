"""headernet_core: the reusable header-detection trainer (library first, thin CLIs on top)."""
