# The two commands of the README do all set-up themselves:
#   make demo   the local multi-cluster demo (left running; make demo-down ends it)
#   make test   the whole test suite, privileged tests included (as root)
#   make bench  every benchmark with real sizes (as root; about 15 minutes),
#               rewriting docs/benchmarks.md and docs/benchmarks.json
SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: setup build test lint bench demo demo-down

setup:
	@bash scripts/setup.sh

build: setup
	cargo build --workspace

lint: setup
	cargo xtask lint

test: setup
	cargo xtask test

bench: setup
	cargo xtask bench

demo: build
	@bash scripts/demo.sh up

demo-down:
	@bash scripts/demo.sh down
