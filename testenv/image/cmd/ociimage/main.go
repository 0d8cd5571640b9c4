// Command ociimage writes a docker-archive image tarball (what `docker save` writes and
// `ctr images import` reads) from layer tar files and image config fields given as flags,
// on an empty base: no image is pulled, no Docker engine is needed.
//
//	ociimage --tag registry.example/app:1 --layer base.tar --layer app.tar \
//	    --user 65532:65532 --entrypoint '["/app"]' --cmd '["run"]' \
//	    --expose 8080/tcp --label k=v --env K=V --workdir /home/app --out app.tar
//
// Layers are applied in the order given. The image is for linux and the architecture
// this program was built for. Created times are the Unix epoch so that the same inputs
// give the same image digest.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// list is a repeatable string flag.
type list []string

func (l *list) String() string     { return strings.Join(*l, ",") }
func (l *list) Set(v string) error { *l = append(*l, v); return nil }

type options struct {
	tag        string
	out        string
	layers     list
	user       string
	entrypoint string
	cmd        string
	expose     list
	labels     list
	env        list
	workdir    string
}

func main() {
	var o options
	flag.StringVar(&o.tag, "tag", "", "image reference written into the tarball (required)")
	flag.StringVar(&o.out, "out", "", "tarball to write (required)")
	flag.Var(&o.layers, "layer", "layer tar file, in order (repeatable; at least one)")
	flag.StringVar(&o.user, "user", "", "config User, e.g. 65532:65532")
	flag.StringVar(&o.entrypoint, "entrypoint", "", `config Entrypoint as a JSON array, e.g. ["/app"]`)
	flag.StringVar(&o.cmd, "cmd", "", `config Cmd as a JSON array, e.g. ["run"]`)
	flag.Var(&o.expose, "expose", "exposed port, PORT/PROTO (repeatable)")
	flag.Var(&o.labels, "label", "label KEY=VALUE (repeatable)")
	flag.Var(&o.env, "env", "environment variable KEY=VALUE (repeatable)")
	flag.StringVar(&o.workdir, "workdir", "", "config WorkingDir")
	flag.Parse()
	if flag.NArg() > 0 {
		fail(fmt.Errorf("unexpected arguments: %q", flag.Args()))
	}
	if err := run(o); err != nil {
		fail(err)
	}
}

func fail(err error) {
	fmt.Fprintf(os.Stderr, "ociimage: %v\n", err)
	os.Exit(1)
}

func run(o options) error {
	if o.tag == "" || o.out == "" || len(o.layers) == 0 {
		return errors.New("--tag, --out and at least one --layer are required")
	}
	tag, err := name.NewTag(o.tag)
	if err != nil {
		return fmt.Errorf("--tag %q: %w", o.tag, err)
	}
	epoch := v1.Time{Time: time.Unix(0, 0).UTC()}

	img := empty.Image
	for _, path := range o.layers {
		layer, err := tarball.LayerFromFile(path)
		if err != nil {
			return fmt.Errorf("layer %s: %w", path, err)
		}
		img, err = mutate.Append(img, mutate.Addendum{
			Layer: layer,
			History: v1.History{
				Created:   epoch,
				CreatedBy: "ociimage --layer " + filepath.Base(path),
			},
		})
		if err != nil {
			return fmt.Errorf("layer %s: %w", path, err)
		}
	}

	cf, err := img.ConfigFile()
	if err != nil {
		return err
	}
	cf = cf.DeepCopy()
	cf.OS = "linux"
	cf.Architecture = runtime.GOARCH
	cf.Created = epoch
	if err := applyConfig(&cf.Config, o); err != nil {
		return err
	}
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		return err
	}
	return write(o.out, tag, img)
}

// applyConfig fills the runtime config from the flags.
func applyConfig(c *v1.Config, o options) error {
	c.User = o.user
	c.WorkingDir = o.workdir
	var err error
	if c.Entrypoint, err = jsonArray("--entrypoint", o.entrypoint); err != nil {
		return err
	}
	if c.Cmd, err = jsonArray("--cmd", o.cmd); err != nil {
		return err
	}
	for _, p := range o.expose {
		if !strings.Contains(p, "/") {
			return fmt.Errorf("--expose %q: want PORT/PROTO, e.g. 8080/tcp", p)
		}
		if c.ExposedPorts == nil {
			c.ExposedPorts = map[string]struct{}{}
		}
		c.ExposedPorts[p] = struct{}{}
	}
	for _, kv := range o.labels {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return fmt.Errorf("--label %q: want KEY=VALUE", kv)
		}
		if c.Labels == nil {
			c.Labels = map[string]string{}
		}
		c.Labels[k] = v
	}
	for _, kv := range o.env {
		if k, _, ok := strings.Cut(kv, "="); !ok || k == "" {
			return fmt.Errorf("--env %q: want KEY=VALUE", kv)
		}
		c.Env = append(c.Env, kv)
	}
	return nil
}

// jsonArray parses an exec-form command; empty means unset.
func jsonArray(flagName, s string) ([]string, error) {
	if s == "" {
		return nil, nil
	}
	var out []string
	if err := json.Unmarshal([]byte(s), &out); err != nil {
		return nil, fmt.Errorf("%s %q: want a JSON array of strings: %w", flagName, s, err)
	}
	return out, nil
}

// write writes the tarball under a temporary name and renames it, so that a failed run
// never leaves a truncated file at the requested path.
func write(out string, tag name.Tag, img v1.Image) error {
	tmp := out + ".tmp"
	if err := tarball.WriteToFile(tmp, tag, img); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("writing %s: %w", out, err)
	}
	return os.Rename(tmp, out)
}
