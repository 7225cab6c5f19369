"""Recording production's traffic to files (`[record]`) and reading them back (`replay`)."""
