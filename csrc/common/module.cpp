// attnfree_ext._C: the root of the attnfree operator library and the Python module that loads it.
// Each op declares its schemas and CPU kernels in csrc/<op>/<op>_ops.cpp (TORCH_LIBRARY_FRAGMENT) and its CUDA
// kernels in csrc/<op>/<op>_cuda.cpp; the root declaration holds nothing op-specific.
#include <torch/library.h>

TORCH_LIBRARY(attnfree, m) {}

#ifdef ATTNFREE_WITH_PYTHON
#include <torch/extension.h>

// Importing attnfree_ext._C loads the registrations of every op; the module itself exposes nothing else.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "attnfree_ext compiled ops: use torch.ops.attnfree.*";
  m.attr("cuda_compiled") = py::bool_(
#ifdef ATTNFREE_WITH_CUDA
      true
#else
      false
#endif
  );
}
#endif
