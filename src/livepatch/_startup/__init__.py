"""Interpreter startup hooks that start the agent (see `livepatch.agent.boot`)."""
