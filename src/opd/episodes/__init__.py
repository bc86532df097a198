"""Multi-turn episodes: environments and the episodic-task declaration (``environments``), the driver that samples
them turn by turn (``driver``), scripted turns (``scripted``), tool calls (``tool_calls``) and search (``search``).
docs/tools.md has the whole picture."""
