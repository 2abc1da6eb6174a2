"""Telemetry ingestion: parsing request logs and traces into domain rows (pure), and loaders."""
