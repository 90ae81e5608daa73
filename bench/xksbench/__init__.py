"""xks-proxy load benchmark: closed/open loop, HTTPS, ceilings and memory (run bench/run)."""
