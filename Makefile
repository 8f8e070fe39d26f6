# The README's two commands.  Each creates .venv and installs harden with torch pinned by constraints.txt
# (a CPU build from local disk; an unpinned torch would pull several GB of CUDA wheels).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT := out
CHECKPOINT := out/lenet5_mnist.pt
METHOD ?= ctt-strict
KEY ?= readme-demo-key

.PHONY: demo test venv clean

$(BIN)/harden: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

venv: $(BIN)/harden

$(CHECKPOINT): | $(BIN)/harden
	mkdir -p $(OUT)
	$(BIN)/python -m harden.examples.train_lenet --out $(CHECKPOINT)

# The main job: harden the example LeNet-5 on the bundled MNIST, export one ONNX graph, certify, evaluate, report.
demo: $(BIN)/harden $(CHECKPOINT)
	mkdir -p $(OUT)
	$(BIN)/harden layers $(CHECKPOINT) --arch harden.examples.lenet:LeNet5 --data mnist
	$(BIN)/harden instrument $(CHECKPOINT) --arch harden.examples.lenet:LeNet5 --data mnist --method $(METHOD) --key $(KEY) -o $(OUT)/lenet.hardened
	$(BIN)/harden export $(OUT)/lenet.hardened -o $(OUT)/lenet.onnx
	$(BIN)/harden inspect $(OUT)/lenet.onnx
	$(BIN)/harden certify $(OUT)/lenet.hardened --eps 0.003 --eps 0.01 --bounds crown --limit 200 --check 100
	$(BIN)/harden evaluate $(OUT)/lenet.onnx --limit 500 \
		--attack fgsm:eps=0.1 --attack fgsm:eps=0.2 --attack bim:eps=0.1 --attack pgd:eps=0.1 --attack deepfool --attack cw
	$(BIN)/harden evaluate $(OUT)/lenet.onnx --adaptive --limit 100
	$(BIN)/harden report $(OUT)/lenet.onnx -o $(OUT)/report.html

test: $(BIN)/harden
	$(BIN)/python -m pytest

clean:
	rm -rf $(OUT) $(VENV)
