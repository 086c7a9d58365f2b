fn main() {
    longmix_build::link_libtorch();
    longmix_build::record_libtorch_version();
}
