"""Conversations kept on the server: a session store behind one interface (SQLite, Redis or DynamoDB)."""
