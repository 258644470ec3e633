"""Reports: text tables for the terminal (text) and report.html (html)."""
