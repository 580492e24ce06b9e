from tether.cli import entry

raise SystemExit(entry())
