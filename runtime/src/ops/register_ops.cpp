// The library's one exported symbol: RegisterCustomOps adds the com.fgq
// domain (TernaryMatMul, TernaryGemm, TernaryConv) to a session's options.
#include <mutex>
#include <string>
#include <vector>

#include "ops.h"

#define FGQ_EXPORT __attribute__((visibility("default")))

namespace {

// Domains stay alive as long as the library: sessions keep pointers to them.
struct DomainKeeper {
  std::mutex mutex;
  std::vector<OrtCustomOpDomain*> domains;
  ~DomainKeeper() {
    if (fgq::ort::g_api)
      for (OrtCustomOpDomain* d : domains) fgq::ort::g_api->ReleaseCustomOpDomain(d);
  }
};
DomainKeeper& keeper() {
  static DomainKeeper k;
  return k;
}

}  // namespace

extern "C" FGQ_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  if (!api_base) return nullptr;
  const OrtApi* api = api_base->GetApi(fgq::ort::kApiVersion);
  if (!api) {
    // GetApi(1) exists in every onnxruntime; CreateStatus sits at the same place in all versions.
    const OrtApi* api1 = api_base->GetApi(1);
    const std::string message = std::string("fgq_ops needs onnxruntime C API version ") +
                                std::to_string(fgq::ort::kApiVersion) + " (onnxruntime >= 1.17); this onnxruntime is " +
                                (api_base->GetVersionString ? api_base->GetVersionString() : "unknown");
    return api1 ? api1->CreateStatus(ORT_FAIL, message.c_str()) : nullptr;
  }
  fgq::ort::g_api = api;
  std::string error;
  if (!fgq::active_dispatch(&error)) return api->CreateStatus(ORT_INVALID_ARGUMENT, error.c_str());

  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* s = api->CreateCustomOpDomain("com.fgq", &domain)) return s;
  const auto convs = fgq::ort::ternary_conv_ops();
  for (OrtCustomOp* op : {fgq::ort::ternary_matmul_op(), fgq::ort::ternary_gemm_op(), convs[0], convs[1], convs[2]}) {
    if (OrtStatus* s = api->CustomOpDomain_Add(domain, op)) {
      api->ReleaseCustomOpDomain(domain);
      return s;
    }
  }
  {
    std::lock_guard<std::mutex> lock(keeper().mutex);
    keeper().domains.push_back(domain);
  }
  return api->AddCustomOpDomain(options, domain);
}
