# refreshd. `make help` lists the targets; longer logic lives in deploy/.
.DEFAULT_GOAL := help
CARGO ?= cargo

.PHONY: help run test tools services build lint bench soak

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

run: services ## start everything locally (refreshd dev) against the local services
	@deploy/local/run.sh

test: services tools ## run every test (unit and integration) against the real services
	$(CARGO) build --workspace --bins # the process tests spawn target/debug/refreshd and refreshctl
	$(CARGO) test --workspace --all-targets --no-fail-fast
	# Alone, after the rest: these restart the shared RabbitMQ and PostgreSQL.
	$(CARGO) test -p refresh-tests --test it -- --ignored --test-threads=1 faults::the_shared_

tools: ## install the offline checkers of deploy/ (kubernetes-validate, KEDA schemas, promtool, hadolint)
	@deploy/checks/tools.sh

services: ## make sure Redis, RabbitMQ and PostgreSQL answer (installs them if missing)
	@deploy/local/services.sh

build: ## build every crate and binary
	$(CARGO) build --workspace --all-targets

lint: ## rustfmt check and clippy with warnings denied
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

bench: services ## run the load scenarios (release) against the local services; table on stdout, JSON in target/bench/results.json
	$(CARGO) build --release -p refreshd -p refresh-bench && target/release/refresh-bench $(SCENARIOS)

soak: services ## 10 min (SOAK_MINUTES) of steady mixed load on ingress, worker and scheduler processes; a row per minute, fails if RSS, fds, queues or p99 grow steadily
	$(CARGO) build --release -p refreshd -p refresh-bench && target/release/refresh-bench soak
