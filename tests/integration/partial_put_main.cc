// Test helper process: opens a PutBlocks stream to vqkvd, sends the header and the first half of
// every block (never the rest, never a commit), prints "sent" and waits to be killed. The
// integration test SIGKILLs it to check that a client dying mid-put leaves nothing visible.
// usage: vqkv_partial_put ADDRESS MODEL_ID BLOCK_BYTES BLOCKS
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "grpcpp/grpcpp.h"
#include "vqkv/v1/vqkv.grpc.pb.h"

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s ADDRESS MODEL_ID BLOCK_BYTES BLOCKS\n", argv[0]);
    return 2;
  }
  auto stub =
      vqkv::v1::Vqkv::NewStub(grpc::CreateChannel(argv[1], grpc::InsecureChannelCredentials()));
  const size_t block_bytes = std::strtoull(argv[3], nullptr, 10);
  const int blocks = std::atoi(argv[4]);
  grpc::ClientContext ctx;
  vqkv::v1::PutBlocksResponse resp;
  auto w = stub->PutBlocks(&ctx, &resp);
  vqkv::v1::PutBlocksRequest r;
  r.mutable_header()->set_model_id(argv[2]);
  for (int i = 0; i < blocks; ++i) {
    vqkv::v1::BlockChunk* c = r.add_chunks();
    c->set_block_hash("partial-" + std::to_string(i));
    c->set_data(std::string(block_bytes / 2, '\x01'));  // f16 ~6e-8: finite
  }
  if (!w->Write(r)) return 1;
  std::printf("sent\n");
  std::fflush(stdout);
  pause();
  return 0;
}
