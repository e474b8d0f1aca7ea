"""Streaming runtime (DESIGN §6): sessions, scheduler, events, text -> TTS handoff."""
