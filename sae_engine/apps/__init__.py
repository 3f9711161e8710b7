"""The applications on top: the demo, the HTML report, LLM descriptions."""
