# qforge: the two set-up commands of the README.
#   make demo   installs what is missing, builds, and runs the demo quantization end to end
#   make test   installs what is missing, builds, and runs every test with ctest
BUILD_DIR ?= build
GENERATOR ?= Ninja
CMAKE_FLAGS ?=
JOBS ?= $(shell nproc)

.PHONY: all deps configure build test demo bench clean

all: build

deps:
	@bash scripts/install-deps.sh

configure: deps
	@if [ ! -f $(BUILD_DIR)/CMakeCache.txt ]; then \
	  cmake -S . -B $(BUILD_DIR) -G "$(GENERATOR)" -DCMAKE_BUILD_TYPE=RelWithDebInfo $(CMAKE_FLAGS); \
	fi

build: configure
	cmake --build $(BUILD_DIR) -j $(JOBS)

test: build
	ctest --test-dir $(BUILD_DIR) --output-on-failure -j $(JOBS)

demo: build
	@bash scripts/demo.sh $(BUILD_DIR)

bench: build
	$(BUILD_DIR)/bench/qforge-bench

clean:
	rm -rf $(BUILD_DIR)
