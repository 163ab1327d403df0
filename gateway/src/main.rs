fn main() {
    println!("printloop-gateway");
}
