"""The agent: drivers → classifier → interval timeline → signed messages → durable outbox → MQTT."""
