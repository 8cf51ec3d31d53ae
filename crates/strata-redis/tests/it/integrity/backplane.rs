//! Forged backplane messages (filled in below).
