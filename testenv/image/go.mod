// Test infrastructure only: the image builder (ociimage) and the programs that go into
// the test images (pause, consumer), built by ./build. Nothing here ships.
//
// To move to another go-containerregistry release: `go get
// github.com/google/go-containerregistry@vX.Y.Z && go mod tidy` here; the build cache key
// covers go.mod and go.sum, so the next ./build rebuilds the tools.
module github.com/scgtoken/scg-token-operator/testenv/image

go 1.26.0

require github.com/google/go-containerregistry v0.22.1

require (
	github.com/klauspost/compress v1.19.2 // indirect
	github.com/opencontainers/go-digest v1.0.0 // indirect
	github.com/opencontainers/image-spec v1.1.1 // indirect
)
