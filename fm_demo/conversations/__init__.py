"""Conversations: transcripts, their references into the prefix-state cache, the session store,
export/import. Replies run through each model's runner (serving/)."""
