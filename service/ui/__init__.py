"""The job dashboard: HTML pages served by the API app under /ui."""
