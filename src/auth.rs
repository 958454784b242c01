//! API keys: placeholder, being written
