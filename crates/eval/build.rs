fn main() {
    longmix_build::link_libtorch();
}
